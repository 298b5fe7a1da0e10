#!/usr/bin/env bash
# The runs of this folder, as run on the 2-core CPU (2026-11-28), one after another.
# L, L1, L2: the layer-3 testbed model of results/testbed-cpu-2026-11-27 section 5 and its seeds 1, 2
# (make testbed; train.loop.seed=1 / 2), each with its slot_stats; R: the testbed run folder (R/data);
# G: the retrofit-gap chain of section 7 (make testbed-retrofit): G/dense (the dense twin) and
# G/distil1000/{train,slot_stats} (its memory retrofit, 1,000-step distilled heal, best step kept).
set -euo pipefail
L=${L:-runs/testbed}; R=${R:-runs/testbed}; L1=${L1:?}; L2=${L2:?}; G=${G:?}
S='"score":"tfidf","count_on":"answer","optimizer":"sgd","top_t":500'
.venv/bin/python scripts/acquisition_diagnosis.py --model $L/train --data $R/data --stats $L/slot_stats --json results/testbed-cpu-2026-11-28-leaks/layer3.json --runs "[{\"name\":\"SMF tfidf t=500 SGD lr 3\",\"method\":\"smf\",\"params\":{$S,\"lr\":3.0}},{\"name\":\"SMF lr 10\",\"method\":\"smf\",\"params\":{$S,\"lr\":10.0}},{\"name\":\"SMF lr 30\",\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}},{\"name\":\"SMF lr 100\",\"method\":\"smf\",\"params\":{$S,\"lr\":100.0}},{\"name\":\"SMF t=50 lr 30\",\"method\":\"smf\",\"params\":{\"score\":\"tfidf\",\"count_on\":\"answer\",\"optimizer\":\"sgd\",\"top_t\":50,\"lr\":30.0}},{\"name\":\"SMF lr 30, rows locked\",\"lock\":true,\"method\":\"smf\",\"params\":{$S,\"lr\":30.0,\"max_df_fraction\":0.99}},{\"name\":\"SMF lazy Adam 3e-2\",\"method\":\"smf\",\"params\":{\"score\":\"tfidf\",\"count_on\":\"answer\",\"optimizer\":\"adam\",\"top_t\":500,\"lr\":0.03}},{\"name\":\"full FT AdamW 3e-5\",\"method\":\"full\",\"params\":{\"lr\":3e-5}},{\"name\":\"full FT AdamW 1e-4\",\"method\":\"full\",\"params\":{\"lr\":1e-4}}]"
.venv/bin/python scripts/acquisition_diagnosis.py --model $G/distil1000/train --data $R/data --stats $G/distil1000/slot_stats --json results/testbed-cpu-2026-11-28-leaks/retrofit.json --runs "[{\"name\":\"distilled retrofit, SMF lr 10\",\"method\":\"smf\",\"params\":{$S,\"lr\":10.0}},{\"name\":\"distilled retrofit, SMF lr 30\",\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}}]"
.venv/bin/python scripts/acquisition_diagnosis.py --model $G/dense --data $R/data --stats $G/distil1000/slot_stats --json results/testbed-cpu-2026-11-28-leaks/dense.json --runs "[{\"name\":\"dense twin, full FT 3e-5\",\"method\":\"full\",\"params\":{\"lr\":3e-5}},{\"name\":\"dense twin, full FT 1e-4\",\"method\":\"full\",\"params\":{\"lr\":1e-4}}]"
S='"score":"tfidf","count_on":"answer","optimizer":"sgd","top_t":50,"max_df_fraction":0.99'
.venv/bin/python scripts/acquisition_diagnosis.py --model $L/train --data $R/data --stats $L/slot_stats --json results/testbed-cpu-2026-11-28-leaks/layer3_t50_lock.json --runs "[{\"name\":\"SMF t=50 lr 30, rows locked\",\"lock\":true,\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}},{\"name\":\"SMF t=50 lr 100, rows locked\",\"lock\":true,\"method\":\"smf\",\"params\":{$S,\"lr\":100.0}}]"
S='"score":"tfidf","count_on":"answer","optimizer":"sgd","top_t":500'
for s in 1 2; do
L=$([ $s = 1 ] && echo $L1 || echo $L2)
.venv/bin/python scripts/acquisition_diagnosis.py --model $L/train --data $R/data --stats $L/slot_stats --json results/testbed-cpu-2026-11-28-leaks/layer3_seed$s.json --runs "[{\"name\":\"seed $s, SMF lr 10\",\"method\":\"smf\",\"params\":{$S,\"lr\":10.0}},{\"name\":\"seed $s, SMF lr 30\",\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}},{\"name\":\"seed $s, full FT 1e-4\",\"method\":\"full\",\"params\":{\"lr\":1e-4}}]"
done
# levers.md: the background with 300 more old-person biographies (a copy of $R whose
# background/stats.jsonl = its 300 Wikipedia documents + 6 biographies per old person, drawn with
# slotwise.testbed.biography and random.Random("stats-bios-extra-6")), slot_stats.max_batches=600;
# the 400-people model: slotwise data ... data.testbed.n_old=400 data.testbed.bios_per_person=5, then
# train / slot_stats with profiles/testbed.yaml; the diagnosis with the same run lists as above.

# Section 4: every fact learnable. The same old population and text, new people's unseen values re-drawn.
.venv/bin/python -m slotwise.components.data --params profiles/testbed.yaml --out runs/testbed_seen/data data.testbed.new_values=seen
.venv/bin/python -m slotwise.components.continual --params profiles/testbed.yaml --model $L/train --data runs/testbed_seen/data --stats $L/slot_stats --out runs/testbed_seen/continual 'continual.methods=[{name: smf_tfidf, method: smf, params: {score: tfidf, top_t: 500, optimizer: sgd, count_on: answer}, sweep: {lr: [3.0, 10.0, 30.0, 100.0]}}, {name: full_ft, method: full, params: {}, sweep: {lr: [3.0e-05, 1.0e-04]}}]'
.venv/bin/python scripts/testbed_tables.py runs/testbed_seen/continual > results/testbed-cpu-2026-11-28-leaks/learnable/tables.md
S='"score":"tfidf","count_on":"answer","optimizer":"sgd","top_t":500'
.venv/bin/python scripts/acquisition_diagnosis.py --model $L/train --data runs/testbed_seen/data --stats $L/slot_stats --json results/testbed-cpu-2026-11-28-leaks/learnable/diagnosis.json --runs "[{\"name\":\"SMF lr 10\",\"method\":\"smf\",\"params\":{$S,\"lr\":10.0}},{\"name\":\"SMF lr 30\",\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}},{\"name\":\"full FT AdamW 1e-4\",\"method\":\"full\",\"params\":{\"lr\":1e-4}}]"

# Section 5, knn 4: the same pretraining with 16 reads per token, then the diagnosis on the learnable facts.
.venv/bin/python -m slotwise.components.train --params profiles/testbed.yaml --model embedded:smollm2-135m-instruct --data $R/data --out runs/testbed_knn4/train --state runs/testbed_knn4/train_state retrofit.insert.memory.knn=4
.venv/bin/python -m slotwise.components.slot_stats --params profiles/testbed.yaml --model runs/testbed_knn4/train --data $R/data --out runs/testbed_knn4/slot_stats
.venv/bin/python scripts/acquisition_diagnosis.py --model runs/testbed_knn4/train --data runs/testbed_seen/data --stats runs/testbed_knn4/slot_stats --json results/testbed-cpu-2026-11-28-leaks/learnable/knn4.json --runs "[{\"name\":\"knn 4, SMF lr 10\",\"method\":\"smf\",\"params\":{$S,\"lr\":10.0}},{\"name\":\"knn 4, SMF lr 30\",\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}},{\"name\":\"knn 4, SMF lr 100\",\"method\":\"smf\",\"params\":{$S,\"lr\":100.0}},{\"name\":\"knn 4, full FT AdamW 1e-4\",\"method\":\"full\",\"params\":{\"lr\":1e-4}}]"

# Section 6: pretraining and data variants on the learnable facts (runs/testbed_seen/data, section 4).
RUNS="[{\"name\":\"SMF lr 10\",\"method\":\"smf\",\"params\":{$S,\"lr\":10.0}},{\"name\":\"SMF lr 30\",\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}},{\"name\":\"SMF lr 100\",\"method\":\"smf\",\"params\":{$S,\"lr\":100.0}},{\"name\":\"full FT AdamW 1e-4\",\"method\":\"full\",\"params\":{\"lr\":1e-4}}]"
.venv/bin/python -m slotwise.components.data --params profiles/testbed.yaml --out runs/testbed_p11/data data.testbed.new_values=seen data.n_paraphrases=11
.venv/bin/python scripts/acquisition_diagnosis.py --model $L/train --data runs/testbed_p11/data --stats $L/slot_stats --json results/testbed-cpu-2026-11-28-leaks/learnable/p11.json --runs "$RUNS"
for v in "two_layers train.pretrain.memory_layers=[2,3]" "heads8 retrofit.insert.memory.heads=8" "steps1400 train.loop.max_steps=1400 train.loop.eval_every=1400"; do
  set -- $v; name=$1; shift
  .venv/bin/python -m slotwise.components.train --params profiles/testbed.yaml --model embedded:smollm2-135m-instruct --data $R/data --out runs/testbed_$name/train --state runs/testbed_$name/train_state "$@"
  .venv/bin/python -m slotwise.components.slot_stats --params profiles/testbed.yaml --model runs/testbed_$name/train --data $R/data --out runs/testbed_$name/slot_stats
  .venv/bin/python scripts/acquisition_diagnosis.py --model runs/testbed_$name/train --data runs/testbed_seen/data --stats runs/testbed_$name/slot_stats --json results/testbed-cpu-2026-11-28-leaks/learnable/$name.json --runs "$RUNS"
done

# Section 7: replay (the profile's model, stats and data after the switch to new_values: seen: make testbed).
.venv/bin/python scripts/acquisition_diagnosis.py --model runs/testbed/train --data runs/testbed/data --stats runs/testbed/slot_stats --json results/testbed-cpu-2026-11-28-leaks/learnable/replay.json --runs "[{\"name\":\"SMF lr 10, replay 2\",\"replay\":2,\"method\":\"smf\",\"params\":{$S,\"lr\":10.0}},{\"name\":\"SMF lr 30, replay 2\",\"replay\":2,\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}},{\"name\":\"SMF lr 30, 15 steps (no replay)\",\"steps\":15,\"method\":\"smf\",\"params\":{$S,\"lr\":30.0}},{\"name\":\"full FT 1e-4, replay 2\",\"replay\":2,\"method\":\"full\",\"params\":{\"lr\":1e-4}},{\"name\":\"full FT 3e-5, replay 2\",\"replay\":2,\"method\":\"full\",\"params\":{\"lr\":3e-5}}]"
