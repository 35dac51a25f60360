"""HL7 v2 ingest: conversion workers, acknowledgements and de-duplication (MLLP transport is
``gateway.mllp``)."""
