"""Writers: captions into the photo's own metadata (EXIF + XMP) and into XMP sidecars."""
