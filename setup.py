from setuptools import find_packages, setup

setup(
    name='mpq_det',
    version='0.1.0',
    description='Post-training multipoint quantization for MMDetection 3.x detectors',
    packages=find_packages(include=['mpq_det', 'mpq_det.*']),
    python_requires='>=3.9',
    install_requires=['torch', 'mmengine>=0.10', 'mmdet>=3.3'],
    extras_require={'onnx': ['onnx', 'onnxruntime']},
)
