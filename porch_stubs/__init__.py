"""Generated code: do not edit; run scripts/generate_stubs.py."""
