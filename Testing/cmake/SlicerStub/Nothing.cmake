# Nothing to generate without Slicer.
