"""Chapter-specific figures and widgets, one module per chapter, built on utils.widgets."""
