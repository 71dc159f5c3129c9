"""porch's database layer: tables (SQLAlchemy Core), engine set-up and Alembic migrations."""
