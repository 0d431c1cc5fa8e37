"""The disaggregated roles: encode, prefill and decode workers, and the router's backend over them."""
