"""Example images of the web demo (`demo.write_examples` draws them)."""
