"""The embedded benchmark's arms of the issue-18 recipes: MiniLLM's LM term reads the language world as plain
text (the benchmark's language without its world's facts), DistiLLM keeps the online teacher even when the
preset asks for the offline top-k cache (the cache cannot cover student samples), DistiLLM-2 trains as a student
arm and DPPO as a preference arm from the SFT arm's model."""

from __future__ import annotations

import json


def test_policy_recipe_arms(tmp_path):
    from kdbench.demo import preset_with
    from kdbench.synthetic.arms import arm_for, arm_train_config
    from kdbench.synthetic.corpus import FILES, CorpusConfig, build_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    build_corpus(CorpusConfig(n_people=16, n_cities=4, language_people=16), corpus)
    preset = preset_with("full", {"teacher_signal": "topk"})

    def config(method, models=None):
        return arm_train_config(arm_for(method), preset, seed=1, corpus_dir=corpus, init_dir=tmp_path / "init",
                                teachers={"teacher": tmp_path / "teacher"}, models=models or {},
                                output_dir=tmp_path / "runs", cache_dir=None)

    minillm = config("minillm")
    language = [json.loads(line) for line in open(corpus / FILES["language"])]
    texts = [json.loads(line)["text"] for line in open(minillm.lm_data)]
    assert len(texts) == len(language) and all(r["output"] in t for r, t in zip(language, texts))
    assert config("kd").lm_data is None and config("dpkd", {("sft", 1): tmp_path / "sft"}).lm_data is None
    assert config("kd").teacher_signal == "topk" and config("distillm").teacher_signal == "online"
    assert arm_for("distillm2").stage == "student" and arm_for("dppo").stage == "preference"
    assert arm_for("dppo").params == {"sft_model": "@sft"}
