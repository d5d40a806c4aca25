"""Initial catalog: adapters and renders.

Revision ID: 0001
Revises:
Create Date: 2025-11-23

Written by hand; tests/test_db_migrations.py checks it against db/models.py. Users, API keys, jobs and the
audit log arrive in later revisions.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("family", sa.String(16), nullable=False),
        sa.Column("adapter_type", sa.String(16), nullable=False),
        sa.Column("source_format", sa.String(16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=True),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("autov2", sa.String(10), nullable=False),
        sa.Column("tensor_sha256", sa.String(64), nullable=False),
        sa.Column("trigger_words", _json(), nullable=False),
        sa.Column("tags", _json(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("metadata_json", _json(), nullable=False),
        sa.Column("training_config", _json(), nullable=True),
        sa.Column("preview_path", sa.Text(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_adapters"),
    )
    op.create_index("ix_adapters_name", "adapters", ["name"], unique=True)
    op.create_index("ix_adapters_sha256", "adapters", ["sha256"], unique=True)
    op.create_index("ix_adapters_autov2", "adapters", ["autov2"], unique=False)
    op.create_index("ix_adapters_tensor_sha256", "adapters", ["tensor_sha256"], unique=True)

    op.create_table(
        "renders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=False),
        sa.Column("backbone", sa.String(32), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("params", _json(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("loras", _json(), nullable=False),
        sa.Column("output_path", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_renders"),
    )
    op.create_index("ix_renders_created_at", "renders", ["created_at"], unique=False)
    op.create_index("ix_renders_status", "renders", ["status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_renders_status", table_name="renders")
    op.drop_index("ix_renders_created_at", table_name="renders")
    op.drop_table("renders")
    op.drop_index("ix_adapters_tensor_sha256", table_name="adapters")
    op.drop_index("ix_adapters_autov2", table_name="adapters")
    op.drop_index("ix_adapters_sha256", table_name="adapters")
    op.drop_index("ix_adapters_name", table_name="adapters")
    op.drop_table("adapters")
