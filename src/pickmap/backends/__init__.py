"""Strategy backends, one module each. Import them through ``pickmap.registry``,
which loads a backend's module only when that backend is used."""
