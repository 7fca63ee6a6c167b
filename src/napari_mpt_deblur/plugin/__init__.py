"""The napari layer: widgets, reader, writer and sample data; everything here calls the headless API."""
