from setuptools import find_packages, setup

setup(
    name="msgd",
    version="0.1.0",
    description="A Twisted daemon that puts one set of application modules behind every protocol",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["msgd", "msgd.*"]) + ["twisted.plugins"],
    package_data={"msgd.web": ["*.js", "*.mjs", "*.html", "*.css"],
                  "twisted": ["plugins/msgd_plugin.py", "plugins/msgd_endpoints.py"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=25.5",   # Site(parsePOSTFormSubmission=...)
        "autobahn>=24.4",
        "orjson>=3.9",
        "prometheus-client>=0.20",
        "sdnotify>=0.3",
        "txredisapi>=1.4.10",
        "ldap3>=2.9",
        "lxml>=5",
        "treq>=23.11",
        "bcrypt>=4",
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
    },
    entry_points={"console_scripts": ["msgd = msgd.tap:main"]},
)
