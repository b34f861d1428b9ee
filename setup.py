import re

from setuptools import find_packages, setup

with open("msgd/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

setup(
    name="msgd",
    version=VERSION,
    description="A Twisted daemon that puts one set of application modules behind every protocol",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license_expression="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Framework :: Twisted",
        "Intended Audience :: Developers",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
        "Topic :: System :: Networking",
        "Typing :: Typed",
    ],
    python_requires=">=3.11",
    packages=find_packages(include=["msgd", "msgd.*"]) + ["twisted.plugins"],
    package_data={"msgd": ["py.typed"], "msgd.web": ["*.js", "*.mjs", "*.html"],
                  "twisted": ["plugins/msgd_plugin.py", "plugins/msgd_endpoints.py"]},
    include_package_data=False,
    # The floors are the lowest versions the suite passes with: .ci/lowest
    # installs exactly these (with the test extras) and runs it.
    install_requires=[
        "twisted[tls]>=26.4",   # 25.5 with a current pyOpenSSL fails TLS ("Context has already been used")
        "autobahn>=24.4.2",
        "orjson>=3.9",
        "prometheus-client>=0.20",
        "sdnotify>=0.3",
        "txredisapi>=1.6.0",    # 1.4.x/1.5.0 never connect the Redis pub/sub bridge
        "ldap3>=2.9",
        "lxml>=5",
        "treq>=23.11",
        "bcrypt>=4",
        "cryptography>=45.0.7",  # msgd.security.tls imports it (the floor pyOpenSSL 25.2 asks for)
    ],
    extras_require={
        "postgres": ["psycopg2-binary>=2.9"],
        "test": [
            "hypothesis>=6",
            "zeep>=4.2",
            "stomp.py>=8",
            "psycopg2-binary>=2.9",
            "websocket-client>=1.6",
            "selenium>=4.10",
            "sseclient-py>=1.7",
        ],
        "lint": [
            "ruff>=0.17,<0.18",
            "mypy>=2.4,<2.5",
            "mypy-zope>=1.0.17,<1.1",
            "build>=1.2",
            "twine>=6.1",
        ],
        "docs": [
            "sphinx>=9,<10",
        ],
    },
    entry_points={"console_scripts": ["msgd = msgd.tap:command"]},
)
