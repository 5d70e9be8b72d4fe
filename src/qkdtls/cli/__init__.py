"""The ``qkdtls`` command line."""
