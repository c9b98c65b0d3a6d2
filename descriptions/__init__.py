"""State descriptions shipped with lmencoders (YAML files, one per environment layout)."""
