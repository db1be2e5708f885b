"""sfsync"""
