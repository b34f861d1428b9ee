"""Catalog: products with prices, stock and pictures — the example for typed
interfaces.  The type hints below are the whole contract: over SOAP they
become the WSDL at ``/soap/catalog?wsdl``, over XML-RPC the answers of
``system.methodSignature``, and arriving values are turned into them (a
struct into a ``Product``, a string into a ``Decimal``).

From Python::

    import zeep
    catalog = zeep.Client("http://127.0.0.1:8080/soap/catalog?wsdl").service
    catalog.add(product={"sku": "B-1", "name": "Book", "price": "12.50", "tags": ["paper"]})

    import xmlrpc.client
    rpc = xmlrpc.client.ServerProxy("http://127.0.0.1:8080/RPC2")
    rpc.catalog.search("book")

Prices are Decimals (money is never a float).  State lives in the module and
survives reloads through ``__reload__``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Optional, TypedDict

from msgd import api

__all__ = ["add", "get", "search", "set_price", "set_picture", "picture", "stock_report", "remove"]

NO_SUCH_PRODUCT = -32020
BAD_PRODUCT = -32021
MAX_PICTURE = 256 * 1024


@dataclass
class Product:
    sku: str
    name: str
    price: Decimal
    tags: list[str] = field(default_factory=list)
    stock: int = 0
    description: Optional[str] = None
    updated: Optional[datetime.datetime] = None


class StockLine(TypedDict):
    sku: str
    stock: int
    value: Decimal


_products: dict[str, Product] = {}
_pictures: dict[str, bytes] = {}


def __reload__(previous):
    """Keep the catalog of the version being replaced."""
    global _products, _pictures
    _products = previous._products
    _pictures = previous._pictures


def _now() -> datetime.datetime:
    req = api.request()
    return datetime.datetime.fromtimestamp(req.clock.seconds(), datetime.timezone.utc).replace(microsecond=0)


def add(product: Product) -> Product:
    """Add a product, or replace the one with the same sku."""
    if not product.sku.strip() or not product.name.strip():
        raise api.AppError("sku and name must not be empty", code=BAD_PRODUCT)
    if product.price < 0 or product.stock < 0:
        raise api.AppError("price and stock must not be negative", code=BAD_PRODUCT,
                           data={"sku": product.sku})
    product.updated = _now()
    _products[product.sku] = product
    return product


def get(sku: str) -> Product:
    """The product with this sku."""
    try:
        return _products[sku]
    except KeyError:
        raise api.AppError(f"no product {sku!r}", code=NO_SUCH_PRODUCT, data={"sku": sku}) from None


def search(text: str = "", tags: Optional[list[str]] = None, max_price: Optional[Decimal] = None) -> list[Product]:
    """Products whose name or description holds ``text``, carrying every tag
    in ``tags`` and costing at most ``max_price``; cheapest first."""
    text = text.lower()
    found = [
        p for p in _products.values()
        if (text in p.name.lower() or text in (p.description or "").lower())
        and set(tags or ()) <= set(p.tags)
        and (max_price is None or p.price <= max_price)
    ]
    return sorted(found, key=lambda p: (p.price, p.sku))


def set_price(sku: str, price: Decimal) -> Product:
    """Change a price."""
    product = get(sku)
    if price < 0:
        raise api.AppError("price must not be negative", code=BAD_PRODUCT, data={"sku": sku})
    product.price = price
    product.updated = _now()
    return product


def set_picture(sku: str, data: bytes) -> int:
    """Store the product's picture; returns its size in bytes."""
    get(sku)
    if len(data) > MAX_PICTURE:
        raise api.AppError(f"picture larger than {MAX_PICTURE} bytes", code=BAD_PRODUCT)
    _pictures[sku] = data
    return len(data)


def picture(sku: str) -> Optional[bytes]:
    """The product's picture, or nothing when it has none."""
    get(sku)
    return _pictures.get(sku)


def stock_report(min_stock: int = 0) -> list[StockLine]:
    """Stock and stock value per product holding at least ``min_stock``."""
    return [StockLine(sku=p.sku, stock=p.stock, value=p.price * p.stock)
            for p in sorted(_products.values(), key=lambda p: p.sku) if p.stock >= min_stock]


def remove(sku: str) -> bool:
    """Remove a product; False when there was none."""
    _pictures.pop(sku, None)
    return _products.pop(sku, None) is not None
