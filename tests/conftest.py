"""Shared by every test folder: pytest puts this folder on sys.path, so ``hf_reference`` (the
transformers reference models and checkpoint writers) imports from any test."""
