from django.contrib import admin

from .models import AuditEntry, Order

admin.site.register(Order)
admin.site.register(AuditEntry)
