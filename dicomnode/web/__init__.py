"""dicomnode.web"""
