"""The evaluate stage's library: lm-eval tasks from local YAML, held-out perplexity (memory on and
off), fact acquisition, plots. Heavy imports (lm_eval, matplotlib) stay inside the submodules that
need them, so `slotwise.config` can import the params schema cheaply."""
