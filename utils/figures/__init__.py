"""Chapter-specific figures and widgets, one module per chapter, on utils.widgets."""
