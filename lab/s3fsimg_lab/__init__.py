"""The S3 test lab: a moto server process, a counting fault-injecting proxy, a sample image dataset.

A development package beside the project (lab/pyproject.toml; not in the s3fsimg wheel), installed
editable into .venv by scripts/bootstrap.sh, so tests/, bench/ and scripts/ import it by name.

``s3fsimg_lab.moto``   owns starting/stopping moto's server as a separate process (:class:`MotoServer`),
                       the credential-free environment for it and the boto3 helpers tests use
                       (:func:`s3_client`, :func:`make_public`, :func:`lab_env`).
``s3fsimg_lab.proxy``  owns the reverse proxy in front of moto (run as ``python -m s3fsimg_lab.proxy``) and
                       its in-test controller :class:`LabProxy` plus the :class:`Fault` description.
``s3fsimg_lab.procs``  owns stopping those child processes (:func:`stop_process`: terminate, wait, kill).
``s3fsimg_lab.images`` owns the deterministic sample dataset generator (:func:`make_dataset`,
                       :func:`make_large_image`).

Nothing is imported here on purpose: ``python -m s3fsimg_lab.proxy`` must not import itself twice.
"""
