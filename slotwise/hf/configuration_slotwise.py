"""SlotwiseConfig: a base decoder's Hugging Face config plus the memory retrofitted into it.

Saved as config.json beside every retrofitted slotwise checkpoint, with this file (imports only
transformers), so that

    AutoConfig.from_pretrained(ckpt, trust_remote_code=True)          # -> SlotwiseConfig

works where slotwise is not installed. model_type "slotwise" is unknown to transformers, so a
load without trust_remote_code fails with an error instead of building the base architecture
with its memory layers' FFNs left randomly initialised.

    text_config   the base decoder's config (LlamaConfig, Qwen2Config, Gemma3TextConfig, ...)
    retrofit      slotwise's RetrofitConfig as a dict: layers, mode, alpha, memory (kind, sizes)
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING


class SlotwiseConfig(PretrainedConfig):
    model_type = "slotwise"
    sub_configs = {"text_config": AutoConfig}
    has_no_defaults_at_init = True  # a config without a base decoder means nothing

    text_config: dict | PretrainedConfig | None = None
    retrofit: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.text_config is None:
            raise ValueError("SlotwiseConfig needs text_config: the base decoder's config")
        if isinstance(self.text_config, dict):
            text = dict(self.text_config)
            if "model_type" not in text:
                raise ValueError("SlotwiseConfig.text_config has no model_type (the base decoder's, e.g. 'llama')")
            self.text_config = CONFIG_MAPPING[text["model_type"]](**text)
        if not isinstance(self.retrofit, dict) or "layers" not in self.retrofit:
            raise ValueError("SlotwiseConfig needs retrofit: a dict with the memory layers (layers, mode, alpha, memory)")
        # The LM head is tied (or not) exactly as in the base decoder.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        super().__post_init__(**kwargs)

    # Read-through views of the base decoder's sizes, for tools that look at the top-level config
    # (lm-eval's max length, pipelines); not stored twice in config.json.
    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def max_position_embeddings(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)


SlotwiseConfig.register_for_auto_class()
