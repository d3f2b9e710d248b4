"""`python -m ei2.app`: the web page (Gradio, the `app` extra). Nothing else in ei2 imports this package."""
