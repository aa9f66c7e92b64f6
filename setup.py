"""Build the compiled settlement core.

Metadata lives in pyproject.toml; this file only holds the extension list and the debug switch.
CITYCARD_DEBUG=1 builds with annotation, line tracing, -O0 -g and AddressSanitizer off (it does not
load into a stock CPython without LD_PRELOAD), so gdb and coverage can see the Cython lines.
"""

import os
import sys
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CITYCARD_DEBUG") == "1"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "scripts"))

from gen_proto import generate  # noqa: E402  (scripts/gen_proto.py: proto/ -> citycard/v1/, do-not-edit)

# The gRPC API's Python code is generated from proto/, the only source, on every build (pip install -e .,
# make proto); it is git-ignored and never edited by hand.
generate(HERE)

compile_args = ["-O0", "-g", "-Wall"] if DEBUG else ["-O3", "-Wall", "-Wno-unused-function"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if DEBUG:
    macros += [("CYTHON_TRACE_NOGIL", "1")]

# Cython resolves the .pxd beside a .pyx by the module's dotted name, so it compiles the module under
# the name its folder gives it ("core._ledger"); the built extension is then installed where the
# package_dir mapping puts it ("citycard.core._ledger"). The init symbol only uses the last part.
INSTALLED_NAME = {"core._ledger": "citycard.core._ledger", "card._des": "citycard.card._des",
                  "card._purchase": "citycard.card._purchase",
                  "apps.bus._tac": "citycard.apps.bus._tac", "citycard.server._h2": "citycard.server._h2"}

extensions = [
    Extension(
        "core._ledger",
        sources=["core/_ledger.pyx"],
        include_dirs=[numpy.get_include(), "core"],
        libraries=["lmdb"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # The card's DES core over libcrypto's EVP API; card/crypto.py falls back to its pure twin without it.
    Extension("card._des", sources=["card/_des.pyx"], libraries=["crypto"], define_macros=macros,
              extra_compile_args=compile_args),
    # A purchase's hot path (card, journal line, SAM, terminal), calling _des through its methods and zlib's
    # crc32; card/purse.py, sam.py, flows.py and apdu.py fall back to their own Python without it.
    Extension("card._purchase", sources=["card/_purchase.pyx"], libraries=["z"], define_macros=macros,
              extra_compile_args=compile_args),
    # Transit's batched TAC check of offline records over libcrypto's low-level DES (deprecated in
    # OpenSSL 3, still exported); apps/bus/tac.py falls back to its pure twin without it.
    Extension("apps.bus._tac", sources=["apps/bus/_tac.pyx"], libraries=["crypto"],
              define_macros=macros + [("OPENSSL_SUPPRESS_DEPRECATED", None)], extra_compile_args=compile_args),
    # HTTP/2 framing over libnghttp2 for the server's front (citycard/server/front.py), which answers the
    # unary CreateTransfers itself and hands every other call to grpcio.
    Extension("citycard.server._h2", sources=["citycard/server/_h2.pyx"], libraries=["nghttp2"],
              define_macros=macros, extra_compile_args=compile_args),
]

compiled = cythonize(
        extensions,
        include_path=["core", "card"],
        annotate=DEBUG,
        compiler_directives={
            "language_level": 3,
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": DEBUG,
            "linetrace": DEBUG,
            "embedsignature": True,
        },
)
for extension in compiled:
    extension.name = INSTALLED_NAME[extension.name]

setup(ext_modules=compiled)
