"""slotwise.continual: the continual update methods (issue 5).

    selection   slot scores (tfidf, kl, tf, random) against a background table, top-t selection
    pools       the value pools of a retrofitted model
    smf         sparse memory finetuning: train only the selected value rows
    delta       sparse deltas (row ids + rows): extract, save/load, apply, revert, stack
    baselines   full finetuning and LoRA
    grit        GRIT: curvature-aware LoRA (K-FAC in rank space, reprojection, rank adaptation)
    updaters    make_updater(method, model, params): one .step(batch) -> dict interface for all
"""
