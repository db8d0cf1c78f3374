"""A tiny SmolVLM backbone written locally, for SmolVLA tests without a hub: LeRobot's SmolVLA reads its VLM with
`AutoConfig.from_pretrained(vlm_model_name)` and `AutoProcessor.from_pretrained(vlm_model_name)`, and its
preprocessor's tokenizer step `AutoTokenizer.from_pretrained(vlm_model_name)`, so `vlm_model_name` may be a local
directory holding what transformers' `save_pretrained` writes: config.json (SmolVLMConfig), the processor files
(SmolVLMImageProcessor, SmolVLMVideoProcessor, processor_config.json) and a tokenizer.

The tokenizer is a real byte-level BPE (`tokenizers`, trained here on a few task sentences): SmolVLM's own tokenizer
is byte-level BPE too, so the newline LeRobot's SmolVLA appends to every task is a token of its own (with a
whitespace-splitting word tokenizer it would vanish and the newline step would go untested). SmolVLM's processor
needs its image special tokens (`fake_image_token`, `global_image_token`, ...), set as the tokenizer's
`extra_special_tokens` exactly as the hub's SmolVLM tokenizer_config does."""

from __future__ import annotations

from pathlib import Path

SPECIAL = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
           "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>",
           "video_token": "<video>"}
PAD = "<|pad|>"
CORPUS = ["pick the cube", "stack the cups", "put the red block in the box", "open the drawer\n",
          "push the green button\n", "pick up the cube and place it on the plate\n"]


def write_tiny_smolvlm(out: Path, *, hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                       image_size: int = 32, patch: int = 8, vision_hidden: int = 32) -> Path:
    """`out` as a SmolVLM model directory: a `hidden`-wide, `layers`-deep text model, a one-layer SigLIP-style
    vision encoder over `image_size` px in `patch` px patches (pixel shuffle 2: (image_size/patch/2)^2 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMProcessor
    from transformers.models.smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[PAD, *SPECIAL.values()],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, extra_special_tokens=SPECIAL,
                                        model_max_length=512)
    vocab = len(tokenizer)
    config = SmolVLMConfig(
        text_config={"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                     "head_dim": hidden // heads, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": patch},
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL["image_token"]),
        pad_token_id=tokenizer.pad_token_id, vocab_size=vocab)
    config.save_pretrained(out)
    size = {"longest_edge": image_size}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=size, max_image_size=size),
        tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        image_seq_len=(image_size // patch // 2) ** 2)
    processor.save_pretrained(out)
    return out
