from setuptools import find_packages, setup

setup(
    name='mpq_det',
    version='0.1.0',
    description='Post-training multipoint quantization for MMDetection 3.x detectors',
    packages=find_packages(include=['mpq_det', 'mpq_det.*']),
    python_requires='>=3.9',
    # the core, the modules and the model pass need torch only; the hook needs mmdet
    install_requires=['torch'],
    extras_require={'mmdet': ['mmengine>=0.10', 'mmdet>=3.3,<3.4', 'mmcv>=2.0,<2.2'],
                    'onnx': ['onnx', 'onnxruntime']},
)
