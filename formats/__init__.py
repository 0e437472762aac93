"""lowbit.formats"""
