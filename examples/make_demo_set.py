"""Build the offline demo set: python examples/make_demo_set.py demo/images"""
import sys

from retrainer.demo import make_demo_set

root = make_demo_set(sys.argv[1] if len(sys.argv) > 1 else "demo/images")
print(f"demo images written to {root}")
