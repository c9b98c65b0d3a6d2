"""The torch modules and update rules behind :mod:`lmencoders.algos`."""
