"""The training kit: what turns a YAML into a run. One schema (`config`), one recipe both entries read,
the Composer entry (`composer_train`, prores-train), the DeepSpeed entry (`deepspeed/`, prores-ds-train),
the reference models, the data pipeline (`data/`, prores-data) and paired comparisons (`compare`).

The ProRes core (`prores_algo`'s top-level modules) never imports from here.
"""
