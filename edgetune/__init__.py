"""edgetune: fine-tune a multimodal LLM on a 4-bit backbone with PEFT, merge, export to ONNX,
and run the bundle offline with onnxruntime alone.

Data flows one way, each stage reading the previous stage's artifact from disk:
recipe -> loaded model -> PEFT-wrapped model -> trained adapter -> merged model -> ONNX bundle -> runtime.
"""

__version__ = "0.1.0"
