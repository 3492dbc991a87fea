"""The S3 test lab: a moto server process, a counting fault-injecting proxy, a sample image dataset.

``tests.lab.moto``   owns starting/stopping moto's server as a separate process (:class:`MotoServer`),
                     the credential-free environment for it and the boto3 helpers tests use
                     (:func:`s3_client`, :func:`make_public`, :func:`lab_env`).
``tests.lab.proxy``  owns the reverse proxy in front of moto (run as ``python -m tests.lab.proxy``) and its
                     in-test controller :class:`LabProxy` plus the :class:`Fault` description.
``tests.lab.procs``  owns stopping those child processes (:func:`stop_process`: terminate, wait, kill).
``tests.lab.images`` owns the deterministic sample dataset generator (:func:`make_dataset`,
                     :func:`make_large_image`).

Nothing is imported here on purpose: ``python -m tests.lab.proxy`` must not import itself twice.
"""
