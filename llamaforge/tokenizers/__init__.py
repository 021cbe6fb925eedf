"""Back-ends of `llamaforge.tokenizer.Tokenizer`: one small module per idea.

- `backends`  the three libraries behind every tokenizer (sentencepiece, tiktoken, Hugging Face
  `tokenizers`) behind one small interface: encode with or without special tokens, decode, pieces.
- `loaders`   a tokenizer file, recognised from its contents, turned into a back-end plus the facts
  around it (BOS/EOS ids, stop ids, chat template, whether BOS is added).
- `gguf_vocab` a GGUF vocabulary (llama.cpp's metadata keys) rebuilt as a `tokenizers.Tokenizer`
  that gives the ids llama.cpp's own tokenizer gives, and `read_gguf_metadata`.

Nothing here imports torch. The public class is `llamaforge.tokenizer.Tokenizer`.
"""
