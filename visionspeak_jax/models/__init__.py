"""The captioner: ResNet encoder, additive attention, LSTM, decoder and its
search."""
