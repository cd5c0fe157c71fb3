"""Past one process: FSDP2 sharding of the student and of frozen models (:mod:`.sharding`), the process
group a command runs in (:mod:`.ranks`) and data-parallel generation with per-rank partial files
(:mod:`.split_generation`). See docs/scaling.md."""
