"""The LoRA catalog: SQLAlchemy models, sessions, repositories, Alembic migrations."""
