"""dicomnode.evaluate"""
