"""slotwise.continual: continual learning, from one update step to the nightly promotion.

    selection   slot scores (tfidf, kl, tf, random) against a background table, top-t selection;
                load_backgrounds reads the slot_stats table
    pools       the value pools of a retrofitted model
    smf         sparse memory finetuning: train only the selected value rows
    delta       sparse deltas (row ids + rows): extract, save/load, apply, revert, stack
    baselines   full finetuning and LoRA
    grit        GRIT: curvature-aware LoRA (K-FAC in rank space, reprojection, rank adaptation)
    updaters    make_updater(method, model, params): one .step(batch) -> dict interface for all
    experiment  the fact stream of the continual stage: one update per fact, measured as it goes
    plots       the continual stage's curves and frontier plots
    nightly     the nightly update's logic: new fact files, SMF on the served model, the retention gate
    serving     the nightly update's serving directory: served delta, promotion registry, lock
"""
