"""jaxicd: Code-Centric Learning for LLM-based ICD-10 coding, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="jaxicd",
    version="0.1.0",
    description=(
        "Fine-tune LLMs in JAX/Flax to assign ICD-10-CM codes with verbatim "
        "evidence (Code-Centric Learning, arXiv 2603.15270)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=setuptools.find_packages(include=["jaxicd", "jaxicd.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "absl-py",
        "ml-collections>=1.0",
        "gguf>=0.17",
        "simple-icd-10-cm>=1.5",
        "numpy>=1.26",
        "safetensors",
        "jinja2>=3.1.6",
    ],
    extras_require={
        # Reference implementations for tests and baselines only; jaxicd never imports torch.
        "test": [
            "pytest",
            "torch==2.13.0",
            "accelerate",
            "peft",
            "scikit-learn",
            "tensorboardX",  # reads our event files back in tests
            "matplotlib",    # the experiment's figure (python -m jaxicd.experiment)
        ],
        "tpu": ["jax[tpu]"],
    },
)
