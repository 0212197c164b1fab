"""Import paths of the seed API (``ma_convert.integrations.generic``)."""
