"""Readers and clients of the data sources (catalog, aerial, labels, street-level services)."""

#: A street-level source name, the catalog's ``source`` and ``fusion --ground``'s: lower-case
#: letters, digits and ``_`` (``gsv``, ``flickr``, ``amsterdam_panorama``, ``mapillary``).
SOURCE_NAME = r"[a-z][a-z0-9_]*"
