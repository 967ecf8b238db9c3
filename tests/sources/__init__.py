"""Tests of the object sources (iptsync.sources): API list+watch and ``--objects`` files."""
