"""loralib's version, in a module of its own so that the modules writing it (adapter configs) need not import the
package."""
__version__ = "0.2.0"
