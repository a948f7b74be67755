output "vpc_id" {
  description = "The VPC."
  value       = aws_vpc.this.id
}

output "vpc_cidr_block" {
  description = "The VPC's IPv4 range."
  value       = aws_vpc.this.cidr_block
}

output "availability_zones" {
  description = "The three availability zones, in subnet order."
  value       = local.azs
}

output "public_subnet_ids" {
  description = "The three public subnets (load balancer, NAT gateway)."
  value       = aws_subnet.public[*].id
}

output "private_subnet_ids" {
  description = "The three private subnets (controller, agents, EFS mount targets, endpoints)."
  value       = aws_subnet.private[*].id
}

output "private_route_table_ids" {
  description = "Route tables of the private subnets."
  value       = aws_route_table.private[*].id
}

output "nat_public_ips" {
  description = "Addresses the private instances reach the internet from (allow-list them where needed)."
  value       = aws_eip.nat[*].public_ip
}
