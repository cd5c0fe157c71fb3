"""The run store: crash-safe files, content-addressed artifacts, and self-describing run directories.

Every piece of resumable work in kdbench goes through the three primitives here:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: write to a
  temporary file in the same folder, fsync, then ``os.replace`` it into place. A reader sees the old
  file or the new one, never half of one.
* :func:`append_jsonl` / :func:`read_jsonl`: append one record per line with flush + fsync. A process
  killed mid-append leaves at most one unterminated last line, which :func:`read_jsonl` ignores (a
  record counts only once its newline is on disk).
* :class:`ArtifactStore`: directories keyed by a hash of their inputs (the config that produced them,
  the kdbench version, tokenizer hashes ...). An artifact is built in a temporary directory and renamed
  into place with a ``COMPLETE.json`` marker written last, so a killed build is never taken as done.

:class:`RunDir` lays out one ``train``/``eval``/``judge`` run: resolved config, package versions, git
revision, an allowlisted environment summary (never a dump of environment variables), metrics in a
schema-versioned long format, generations, stage records and a log.

The package's modules: :mod:`kdbench.store.files` (crash-safe files, hashes), :mod:`kdbench.store.artifacts`
(the artifact store), :mod:`kdbench.store.runs` (run directories); everything is importable from here.
"""

from kdbench.store.artifacts import Artifact, ArtifactStore, default_cache_dir, kdbench_version, utc_now
from kdbench.store.files import (COMPLETE_MARKER, append_jsonl, atomic_write_bytes, atomic_write_json,
                                 atomic_write_text, canonical_json, file_lock, hash_file, hash_obj, hash_tree,
                                 json_default, read_jsonl)
from kdbench.store.runs import (METRICS_SCHEMA_VERSION, RERUN_MAY_CHANGE, RunDir, StageRecords, changed_settings,
                                environment_summary, fail_open_runs, find_run_dirs, git_revision, package_versions)

__all__ = ["Artifact", "ArtifactStore", "COMPLETE_MARKER", "METRICS_SCHEMA_VERSION", "RERUN_MAY_CHANGE", "RunDir",
           "StageRecords", "append_jsonl", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "canonical_json", "changed_settings", "default_cache_dir", "environment_summary", "fail_open_runs",
           "file_lock", "find_run_dirs", "git_revision", "hash_file", "hash_obj", "hash_tree", "json_default",
           "kdbench_version", "package_versions", "read_jsonl", "utc_now"]
