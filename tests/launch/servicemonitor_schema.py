"""The part of the ServiceMonitor CRD (monitoring.coreos.com/v1, prometheus-operator's
published openAPIV3Schema) that pdserve's manifests use, written out by hand for jsonschema.

kubernetes-validate ships only the built-in kinds and skips a CRD's kind with a warning, so
this test schema stands in for it: the CRD's required fields (spec; spec.selector and
spec.endpoints), and the types, patterns and enums of the fields we set. Unlike the CRD it
refuses unknown fields: the API server would prune them silently, so a typo would be
accepted and ignored.
"""

from __future__ import annotations

DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
            r"(([0-9]+)ms)?)$")

_SECRET_KEY_SELECTOR = {
    "type": "object", "required": ["key"], "additionalProperties": False,
    "properties": {"key": {"type": "string"}, "name": {"type": "string"},
                   "optional": {"type": "boolean"}},
}

_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}

_ENDPOINT = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": DURATION},
        "scrapeTimeout": {"type": "string", "pattern": DURATION},
        "authorization": {"type": "object", "additionalProperties": False, "properties": {
            "type": {"type": "string"}, "credentials": _SECRET_KEY_SELECTOR}},
    },
}

SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object", "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array"}}},
            },
        },
    },
}
