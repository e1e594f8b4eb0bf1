"""The network and its optimizer: LeNet-5's layers, the model over one flat parameter vector, SGD and its
schedules, and the ONNX export."""
