"""The one compiled part: albef.data._jpegcrop, region-of-interest JPEG decoding against the system libjpeg-turbo
(Debian: libjpeg62-turbo-dev, installed by ``make setup`` as root). Optional: without a compiler or the headers the
install still succeeds and the loader decodes whole JPEGs with OpenCV (same pixels, slower), saying so once."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "albef.data._jpegcrop",
            ["albef/data/_jpegcrop.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
