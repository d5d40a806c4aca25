"""Gate sets: gated fusion's trained gates, one row per LoRA set and base model (the set's key is
order-insensitive over its catalog names and file hashes), the gate tensors as safetensors bytes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Written by hand; tests/test_db_migrations.py checks it against db/models.py.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "gate_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("backbone", sa.String(32), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("set_key", sa.String(64), nullable=False),
        sa.Column("adapters", _json(), nullable=False),
        sa.Column("gates", sa.LargeBinary(), nullable=False),
        sa.Column("record", _json(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gate_sets"),
        sa.UniqueConstraint("backbone", "model", "set_key", name="uq_gate_sets_backbone_model_set_key"),
    )
    op.create_index("ix_gate_sets_set_key", "gate_sets", ["set_key"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_gate_sets_set_key", table_name="gate_sets")
    op.drop_table("gate_sets")
