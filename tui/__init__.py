"""meterline's operator console (Textual)."""
